from unetlm.core.errors import UsageError


class RecipeError(UsageError):
    """A recipe is invalid. The message names the key path, the value and what is allowed."""
