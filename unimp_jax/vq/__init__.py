"""The image tokenizer (user-guided image generation): unimp_jax.vq.model, trained by unimp_jax.vq.train."""
