"""Recipes, registered by name. Importing this package imports every module in it, and each module
registers its recipe with ``@register_recipe`` — a new recipe is one new file here plus one overlay in
``recipes/NAME.yaml``. See ``vitshrink.recipes.base`` for the interface a recipe implements.
"""
import importlib
import pkgutil

from vitshrink.config import load_preset  # noqa: F401
from vitshrink.recipes.base import (Recipe, RecipeContext, get_recipe, recipe_names,  # noqa: F401
                                    register_recipe)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
