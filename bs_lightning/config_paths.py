"""Where the Hydra configs live, in a checkout and in an installed package.

A checkout keeps them at the repository root (`conf/`, `recipes/`); a wheel ships them inside
the package (`bs_lightning/conf/`, `bs_lightning/recipes/`, copied by setup.py's build step).
Recipes are files of `recipes/` but Hydra's config group `recipe` (`bs-train recipe=NAME`), so
they are registered in Hydra's ConfigStore under that group rather than found on disk.
"""

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

_PACKAGE = Path(__file__).resolve().parent
# installed package first, then the checkout's root
_CANDIDATES = (_PACKAGE, _PACKAGE.parent)


def config_dirs() -> tuple[Path, Path]:
    """The `conf/` and `recipes/` folders in use.

    Returns:
        `(conf_dir, recipes_dir)`, absolute.

    Raises:
        FileNotFoundError: naming the places it looked, when neither holds `conf/config.yaml`
            and `recipes/`.
    """
    for base in _CANDIDATES:
        if (base / "conf" / "config.yaml").is_file() and (base / "recipes").is_dir():
            return base / "conf", base / "recipes"
    looked = ", ".join(str(b / "conf") for b in _CANDIDATES)
    raise FileNotFoundError(
        f"bs-lightning's Hydra configs not found (looked for conf/config.yaml and recipes/ in "
        f"{looked}); reinstall the package (`pip install bs-lightning`) or run from a checkout"
    )


def register_recipes(recipes_dir: Path | None = None) -> list[str]:
    """Register every `recipes/*.yaml` as option NAME of the config group `recipe`.

    A recipe is applied at the global package (its file starts with `# @package _global_`)
    and may override group choices in its own defaults list (`override /model: lstm_lm`).

    Args:
        recipes_dir: folder of the recipe files; defaults to the one `config_dirs()` finds.

    Returns:
        The registered recipe names, sorted.
    """
    recipes_dir = recipes_dir or config_dirs()[1]
    store = ConfigStore.instance()
    names = []
    for path in sorted(recipes_dir.glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names
