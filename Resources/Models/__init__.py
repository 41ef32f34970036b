"""Models shipped with DeepRegister (weights, JSON config, SHA-256, model card)."""
