"""Where the Hydra configs live, in a checkout and in an installed package.

A checkout keeps them at the repository root (`conf/`, `recipes/`); a wheel ships them inside
the package (`bs_lightning/conf/`, `bs_lightning/recipes/`, copied by setup.py's build step).
Recipes are files of `recipes/` but Hydra's config group `recipe` (`bs-train recipe=NAME`), so
they are registered in Hydra's ConfigStore under that group rather than found on disk.
Nothing registers at import: `bs-train` (`bs_lightning.train.main`) calls `register_recipes`
before Hydra composes, and code that composes the config itself (tests, notebooks) calls
`compose_config`, which does both.
"""

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

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


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "config", return_hydra_config: bool = False
) -> DictConfig:
    """Compose `bs-train`'s config in code, as the command line would (`recipe=NAME` works).

    Registers the recipes first, so `recipe=NAME` is found without `bs_lightning.train`'s
    entry point having run. Interpolations stay unresolved (`${oc.env:...}` is read when a
    value is accessed).

    Args:
        overrides: Hydra overrides, e.g. `["recipe=quickstart", "pruning.sparsity=0.9"]`.
        config_name: the primary config of `conf/`.
        return_hydra_config: keep the `hydra` node (run and sweep folders) in the result.

    Returns:
        The composed config.

    Raises:
        hydra.errors.MissingConfigException: for an unknown option (listing the valid ones).
        hydra.errors.ConfigCompositionException: for an override of a key that does not exist.
    """
    conf_dir, recipes_dir = config_dirs()
    register_recipes(recipes_dir)
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return compose(
            config_name, overrides=list(overrides), return_hydra_config=return_hydra_config
        )
