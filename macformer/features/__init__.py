"""Random feature maps phi with E[phi(x) . phi(y)] = k(x, y), and the weight samplers they draw from."""

from macformer.features.base import FeatureMap
from macformer.features.favor import PositiveRandomFeatures
from macformer.features.fourier import RandomFourierFeatures
from macformer.features.maclaurin import RandomMaclaurinFeatures
from macformer.features.samplers import SAMPLERS, get_sampler

__all__ = [
    "SAMPLERS",
    "FeatureMap",
    "PositiveRandomFeatures",
    "RandomFourierFeatures",
    "RandomMaclaurinFeatures",
    "get_sampler",
]
