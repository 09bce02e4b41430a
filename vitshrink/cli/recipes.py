"""The recipes commands: list the recipes, show every setting of one with its default and source."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from vitshrink.cli import app, console

recipes_app = typer.Typer(help="List the recipes, or show every setting of one (default and source).",
                          invoke_without_command=True, no_args_is_help=False)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def list_recipes(ctx: typer.Context) -> None:
    """List the recipes (name and what it does)."""
    if ctx.invoked_subcommand is not None:
        return
    from vitshrink.recipes import get_recipe, recipe_names

    for name in recipe_names():
        doc = (type(get_recipe(name)).__doc__ or "").strip().splitlines()
        console.print(f"{name:10} {doc[0] if doc else ''}", markup=False, highlight=False, soft_wrap=True)
    console.print("`vitshrink recipes show NAME` lists a recipe's settings.", markup=False, highlight=False)


@recipes_app.command("show")
def show(name: Annotated[str, typer.Argument(help="recipe name")],
         key: Annotated[Optional[str], typer.Option("--key", help="show this setting only")] = None) -> None:
    """Every setting of recipe NAME: the flag, its default, the file that sets it and the source it cites."""
    import yaml

    from vitshrink.config import describe_recipe, flag_name
    from vitshrink.errors import UserError
    from vitshrink.recipes import get_recipe

    get_recipe(name)
    rows = describe_recipe(name)
    if key is not None:
        rows = [row for row in rows if row.key == key]
        if not rows:
            raise UserError(f"--key {key!r}: not a setting of recipe {name}")
    console.print(f"recipe {name}: settings (flag = default  [file]  source); own options marked *",
                  markup=False, highlight=False)
    for row in rows:
        default = yaml.safe_dump(row.default, default_flow_style=True).strip().removesuffix("...").strip()
        mark = "*" if row.option else " "
        console.print(f"{mark} {flag_name(row.key)} = {default}  [{row.file}]", markup=False, highlight=False,
                      soft_wrap=True)
        if row.comment:
            console.print(f"      {row.comment}", markup=False, highlight=False, soft_wrap=True)
