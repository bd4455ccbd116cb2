"""Image parameterization for channel portraits: a decorrelated Fourier basis, after Lucid.

An image is not optimized pixel by pixel. Its learnable parameter is a spectrum, real and imaginary part
per colour channel, of shape ``(B, 3, H, W // 2 + 1, 2)``. Each step turns it into RGB:

1. every coefficient is multiplied by ``1 / max(f, 1 / max(H, W)) ** decay`` (``f`` its frequency in
   cycles per pixel), so that one Adam step moves low frequencies as much as natural images vary there
   (their power falls roughly as ``1 / f**2``); without this the optimizer paints high-frequency noise;
2. ``irfft2`` (orthonormal) gives a real image in a *decorrelated* colour space, damped by
   :data:`IMAGE_DAMPING`;
3. a fixed 3x3 matrix (:func:`color_correlation_sqrt`) maps the decorrelated colours to correlated RGB,
   so that independent parameters produce colours with the statistics of ImageNet pixels;
4. a sigmoid maps to ``(0, 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from featuremaps.portrait.errors import PortraitError

# Principal components of the RGB values (scaled to [0, 1]) of the ImageNet training pixels, as published
# with AlexNet's "PCA lighting" augmentation (Krizhevsky et al. 2012; the numbers of fb.resnet.torch).
# Columns of the eigenvector matrix are the components; rows are R, G, B.
IMAGENET_RGB_EIGENVALUES = (0.2175, 0.0188, 0.0045)
IMAGENET_RGB_EIGENVECTORS = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

#: The decorrelated image is multiplied by this before the colour matrix: with the initial spectrum's
#: standard deviation of 0.01 it keeps the first image close to grey, and it is the scale for which
#: Lucid's learning rate of 0.05 was tuned.
IMAGE_DAMPING = 0.25


def imagenet_rgb_covariance() -> Tensor:
    """The 3x3 covariance of ImageNet RGB pixel values, ``V diag(lambda) V^T`` from the published PCA.

    Returns:
        A float64 tensor ``(3, 3)``, rows and columns R, G, B.
    """
    vectors = torch.tensor(IMAGENET_RGB_EIGENVECTORS, dtype=torch.float64)
    values = torch.tensor(IMAGENET_RGB_EIGENVALUES, dtype=torch.float64)
    return vectors @ torch.diag(values) @ vectors.T


def color_correlation_sqrt() -> Tensor:
    """The colour matrix ``M`` that maps decorrelated colours to RGB: a square root of the RGB covariance.

    ``M = U diag(sqrt(s / s_max))`` where ``C = U diag(s) U^T`` is the eigendecomposition (its SVD, ``C``
    being symmetric) of :func:`imagenet_rgb_covariance`. Then ``M M^T = C / s_max``: a unit-variance
    decorrelated vector becomes an RGB vector with ImageNet's colour covariance, scaled so that the
    strongest axis (luminance, about ``(1, 1, 1) / sqrt(3)``) has unit length. This is the construction of
    Lucid's ``color_correlation_svd_sqrt`` divided by its largest column norm, computed here from the
    covariance rather than copied. Signs are fixed so the red entry of every column is positive (the first
    column is then "brighter" in all three channels).

    Returns:
        A float32 tensor ``(3, 3)``; column k is the RGB direction of decorrelated channel k.
    """
    values, vectors = torch.linalg.eigh(imagenet_rgb_covariance())  # ascending eigenvalues
    values, vectors = values.flip(0), vectors.flip(1)
    vectors = vectors * torch.sign(vectors[0:1, :])
    return (vectors * torch.sqrt(values / values[0])).to(torch.float32)


def frequency_scale(height: int, width: int, *, decay: float = 1.0) -> Tensor:
    """The per-coefficient scale ``1 / max(f, 1 / max(H, W)) ** decay`` of an ``rfft2`` spectrum.

    Args:
        height, width: the image size.
        decay: the exponent; 1 gives the ``1 / f`` amplitude of natural images, 0 a plain Fourier basis.

    Returns:
        A float32 tensor ``(H, W // 2 + 1)``; ``f`` is the radial frequency in cycles per pixel.
    """
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
    freq = torch.sqrt(fx**2 + fy**2).clamp_min(1.0 / max(height, width))
    return (1.0 / freq**decay).to(torch.float32)


class FourierImage:
    """Turns a learnable spectrum ``(B, 3, H, W // 2 + 1, 2)`` into RGB images ``(B, 3, H, W)`` in (0, 1).

    Args:
        height, width: the image size.
        decay: the exponent of the frequency scaling (see :func:`frequency_scale`).
        sd: standard deviation of the initial spectrum.
        device: where the spectrum lives.
    """

    def __init__(self, height: int, width: int, *, decay: float = 1.0, sd: float = 0.01, device="cpu") -> None:
        if (
            isinstance(height, bool)
            or isinstance(width, bool)
            or not (isinstance(height, int) and isinstance(width, int))
        ):
            raise PortraitError(f"image size must be integers, got {height!r} x {width!r}")
        if height < 2 or width < 2:
            raise PortraitError(f"image size {height}x{width} is too small: use at least 2x2 pixels")
        self.height, self.width, self.decay, self.sd = height, width, float(decay), float(sd)
        self.device = torch.device(device)
        self.scale = frequency_scale(height, width, decay=decay).to(self.device)
        self.color = color_correlation_sqrt().to(self.device)

    @property
    def spectrum_shape(self) -> tuple[int, int, int, int]:
        """The shape of one image's spectrum: ``(3, H, W // 2 + 1, 2)``."""
        return (3, self.height, self.width // 2 + 1, 2)

    def random_spectrum(self, generators: Sequence[torch.Generator]) -> Tensor:
        """A fresh spectrum, one image per generator, each drawn from its own (CPU) generator only.

        Image i is therefore the same whatever the other generators are, which makes batches reproducible
        image by image.
        """
        if not generators:
            raise PortraitError("random_spectrum needs at least one generator: pass one per image")
        parts = [torch.randn(self.spectrum_shape, generator=g, dtype=torch.float32) * self.sd for g in generators]
        return torch.stack(parts).to(self.device)

    def decorrelated(self, spectrum: Tensor) -> Tensor:
        """The image in decorrelated colour space, before the colour matrix and the sigmoid."""
        if spectrum.dim() != 5 or tuple(spectrum.shape[1:]) != self.spectrum_shape:
            raise PortraitError(
                f"spectrum has shape {tuple(spectrum.shape)}, expected (B, {', '.join(map(str, self.spectrum_shape))})"
            )
        coeffs = torch.view_as_complex(spectrum.contiguous()) * self.scale
        return torch.fft.irfft2(coeffs, s=(self.height, self.width), norm="ortho") * IMAGE_DAMPING

    def __call__(self, spectrum: Tensor) -> Tensor:
        """RGB images ``(B, 3, H, W)`` in (0, 1), differentiable in ``spectrum``."""
        flat = self.decorrelated(spectrum)
        rgb = (self.color @ flat.flatten(2)).reshape(flat.shape)  # per pixel: M @ colour
        return torch.sigmoid(rgb)
