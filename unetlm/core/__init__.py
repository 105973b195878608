"""Ground floor: the vocabulary every other package speaks (byte tokens, the stage layout,
the empty options table). Imports nothing else of unetlm."""
