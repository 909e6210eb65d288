"""Distances in the paper's cosmology (K20 §1; FACTS.md §10): kpc/arcsec, D_L, D_ls/D_s."""

from __future__ import annotations

import astropy.units as u

from klever_nb.constants import COSMOLOGY
from klever_nb.errors import ConfigError


def kpc_per_arcsec(redshift: float) -> float:
    """Proper kpc per arcsec at ``redshift`` (FlatLambdaCDM 67.8/0.308).

    Examples
    --------
    >>> round(kpc_per_arcsec(1.5), 2)
    8.69
    """
    return float(COSMOLOGY.kpc_proper_per_arcmin(redshift).to(u.kpc / u.arcsec).value)


def luminosity_distance_cm(redshift: float) -> float:
    """Luminosity distance in cm."""
    return float(COSMOLOGY.luminosity_distance(redshift).to(u.cm).value)


def dls_over_ds(z_lens: float, z_source: float) -> float:
    """Lensing efficiency D_ls / D_s (angular-diameter distances) for a source behind a lens.

    Deflection maps in the ``dls_ds`` normalisation (Frontier Fields / CLASH: D_ls/D_s = 1)
    are multiplied by this factor to give the deflection for a source at ``z_source``.

    Raises
    ------
    ConfigError
        If the source is not behind the lens.
    """
    if not z_source > z_lens:
        raise ConfigError(f"source redshift {z_source} must be larger than lens redshift {z_lens}")
    d_ls = COSMOLOGY.angular_diameter_distance(z_lens, z_source)
    d_s = COSMOLOGY.angular_diameter_distance(z_source)
    return float((d_ls / d_s).decompose().value)
