"""One module per part of PixelLLM."""
