"""Model towers: vision encoder, perceiver connector, language model, and UniMP."""
