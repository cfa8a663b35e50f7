"""UniMP in JAX: one vision-language model for multi-modal personalization."""
