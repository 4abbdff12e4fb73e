"""Benchmarks for rgpo, side by side with TRL's ``GRPOTrainer``: ``python -m benchmarks --quick --out DIR``.

One command measures, per phase and for the whole step, the time (median over the measured steps, after warm-up
steps), the throughput (chains/s, images/s, generated tokens/s) and the peak memory, then writes ``bench.md`` and
``bench.json`` under ``--out``. One module per benchmark over a shared harness (:mod:`benchmarks.harness`):

1. :mod:`benchmarks.rgpo_step`: **the rgpo step** (reason then draw), phase by phase: rollout text, rollout
   forward (policy + reference), the reference forward on its own (``rollout/reference``), rollout images,
   rewards, advantages, update.
2. :mod:`benchmarks.scaling`: **scaling** of the step with G, decoder steps, image size and completion length.
3. :mod:`benchmarks.trl_compare`: **rgpo vs TRL**, text only, on the same tiny language model and settings.
4. :mod:`benchmarks.bare_pieces`: **trainer overhead**, the step minus the same work as bare model calls.
5. :mod:`benchmarks.ablations`: **optimisations, each on vs off**, each naive path (:mod:`benchmarks.naive`)
   checked to compute the same result.
6. :mod:`benchmarks.floor` (``python -m benchmarks floor``): **each phase against its floor**, the work counted
   from the model's shapes (:mod:`benchmarks.costmodel`) over the machine's measured GEMM and bandwidth peaks, the
   compiled static-cache decode against the eager loop, and the image-cost levers; writes ``floor.md`` /
   ``floor.json``.

Every measured configuration runs in a worker subprocess of its own (several side by side only where said), one
after the other (never in parallel), so memory numbers start from a clean process.

Nothing in rgpo is patched: the trainer's step timer is set through ``RGPOTrainer.timer_factory``, the reference
forward is the trainer's own ``rollout/reference`` phase, and the few documented model switches the benchmarks
flip (EOS banning for equal work, LoRA targets without lm_head for TRL) live in :mod:`benchmarks.switches`.

Equal work: end-of-sequence tokens are BANNED in both trainers (rgpo: added to the model's ``banned_token_ids``;
TRL: ``generation_kwargs={"suppress_tokens": ...}``), so every chain is exactly ``max_new_tokens`` /
``max_completion_length`` long and both generate the same number of tokens.

Memory: CUDA: ``torch.cuda.max_memory_allocated`` (reset before each step / phase). CPU: the process's
resident-set high-water mark (``VmHWM`` of ``/proc/self/status``), reset before each step / phase by writing 5
to ``/proc/self/clear_refs``; where that is not possible, a 5 ms psutil sampler thread. Reported as the peak
during the step (absolute) and as the rise over the resident size at the step's start ("transient").

Usage::

    python -m benchmarks --quick                          # tiny model on CPU, a few minutes
    python -m benchmarks --quick --steps 2 --skip-trl --skip-scaling --skip-bare   # smoke test
    python -m benchmarks --config configs/mindomni_rgpo.yaml --set model.path=/path/to/checkpoint --steps 5
    python -m benchmarks --mindomni-7b                    # the GPU figures (random weights, released sizes)
    python -m benchmarks floor --out bench_floor          # time / floor per phase, tiny and mid shapes (~20 min)

On a shared machine, timings are only comparable within one run; the report records the load average.
"""
