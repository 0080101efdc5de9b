"""Model families with Hugging Face parameter names; `registry.get_model_class` picks one by architecture."""
