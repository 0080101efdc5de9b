"""The model runner: scheduler output → tensors → model → logits → sampled tokens."""
