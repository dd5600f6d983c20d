"""Training: the k-candidate datasets, method -> loss wiring, AFTConfig and AFTTrainer.

Import from the submodules (or `from aftune import AFTConfig, AFTTrainer`); this package imports nothing
itself, so reading a config's fields does not load torch.
"""
