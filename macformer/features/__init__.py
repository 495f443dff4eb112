"""Random feature maps phi with E[phi(x) . phi(y)] = k(x, y), and the weight samplers they draw from."""

from macformer.features.base import FeatureMap
from macformer.features.maclaurin import RandomMaclaurinFeatures
from macformer.features.samplers import SAMPLERS, get_sampler
from macformer.features.spectral import COMPONENTS, WEIGHTS, SpectralFeatures

__all__ = [
    "COMPONENTS",
    "SAMPLERS",
    "WEIGHTS",
    "FeatureMap",
    "RandomMaclaurinFeatures",
    "SpectralFeatures",
    "get_sampler",
]
