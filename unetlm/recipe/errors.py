class RecipeError(ValueError):
    """A recipe is invalid. The message names the key path, the value and what is allowed."""
