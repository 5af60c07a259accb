"""Unsupervised mineral prospectivity mapping: fusion-conv ViT autoencoder on xarray, Zarr and Dask."""

from .config import RunConfig
from .cube import open_cube, write_cube

__version__ = "0.1.0"
__all__ = ["RunConfig", "open_cube", "write_cube", "__version__"]
