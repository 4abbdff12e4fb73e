"""Examples of user-written rewards, loadable by file path or dotted path from a config."""
