"""Unsupervised mineral prospectivity mapping: fusion-conv ViT autoencoder on xarray, Zarr and Dask."""

from pipeline.config import RunConfig
from pipeline.data.cube import open_cube, write_cube

__version__ = "0.1.0"
__all__ = ["RunConfig", "open_cube", "write_cube", "__version__"]
