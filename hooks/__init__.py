"""layrot.hooks: framework hooks (PyTorch, TensorFlow, Keras) and the Layca optimizers."""
