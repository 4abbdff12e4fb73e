"""The run configs rgpo ships (YAML run configs, DeepSpeed JSON, example prompts), installed as ``rgpo.configs`` so
a non-editable install has them too: ``rgpo train --config tiny`` names one by its file name."""
