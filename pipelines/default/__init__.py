"""The embedded default pipeline: a tiny PixArt-style text-to-image model trained on shapes."""
