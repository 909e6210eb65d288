"""Strong-line ratio definitions: THE one place where line ratios are assembled.

Every diagnostic is written as a sum of products of linear combinations of line fluxes,

    R = sum_t  prod_f  (sum_i a_{f,i} F_i) ** e_f ,      e_f = +1 or -1,

which covers plain ratios (R3 = [OIII]5007/Hbeta), ratios of doublet sums
(R2, S2), ratios of ratios (O3N2, O3S2) and the one sum of two ratios (RS32).
From this single form we get the value *and* the exact first derivatives
d log10 R / d log10 F_i, which propagate the flux errors into log space
(including fully correlated tied lines, e.g. [OIII]4959 = [OIII]5007 / 2.98,
and, optionally, the dust correction and its E(B-V)).

Definitions (FACTS.md §1.2; C20 Table 2):

======  ======================================================================
R2      ([OII]3727 + [OII]3729) / Hbeta
R3      [OIII]5007 / Hbeta
O3O2    [OIII]5007 / ([OII]3727 + [OII]3729)
R23     ([OII]3727 + [OII]3729 + [OIII]4959 + [OIII]5007) / Hbeta
N2      [NII]6584 / Halpha
O3N2    ([OIII]5007 / Hbeta) / ([NII]6584 / Halpha)
S2      ([SII]6717 + [SII]6731) / Halpha
RS32    [OIII]5007 / Hbeta + ([SII]6717 + [SII]6731) / Halpha
O3S2    ([OIII]5007 / Hbeta) / (([SII]6717 + [SII]6731) / Halpha)
======  ======================================================================

Decisions (FACTS.md §1.2, §11):

- R23 includes [OIII]4959 (Pagel-type definition, as pyOxy). When the fit tied
  4959 to 5007 (or 4959 is absent), 4959 is replaced by 5007 / ``OIII_RATIO``,
  so its error is 100 % correlated with 5007's (a sum 5007 (1 + 1/2.98)).
- O3S2 has Hbeta in the numerator's denominator (pyOxy's ratio assembly drops
  it: that is a bug, FACTS.md §1.2).
- SNR thresholds (K20 §4.2): 5 on Halpha and [OIII]5007, 2.5 on every other
  line. Doublets that enter as a sum ([OII], [SII]) are tested on the SNR of
  the sum; a tied [OIII]4959 is not tested (it has no independent SNR).
- Errors of different lines are independent, except the two members of a
  ratio-bounded doublet ([SII], [OII]) fitted together: their covariance comes from
  the fitter's ``pair_sum_err`` (the 1σ of their sum), cov = (σ_sum² − σ_a² − σ_b²)/2,
  and enters both the SNR of the summed species and the error of the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from klever_nb.constants import (
    LINES,
    METALLICITY_SNR_STRONG,
    METALLICITY_SNR_WEAK,
    OIII_RATIO,
    R_V,
)
from klever_nb.errors import ConfigError

LN10 = np.log(10.0)

#: Lines to which the strong SNR threshold applies (K20 §4.2); all others use the weak one.
STRONG_LINES = ("Halpha", "OIII_5007")

Combo = tuple[tuple[str, float], ...]
"""A linear combination of line fluxes: ((line, coefficient), ...)."""

_OII: Combo = (("OII_3727", 1.0), ("OII_3729", 1.0))
_SII: Combo = (("SII_6717", 1.0), ("SII_6731", 1.0))
_O3: Combo = (("OIII_5007", 1.0),)
_O3_BOTH: Combo = (("OIII_4959", 1.0), ("OIII_5007", 1.0))
_HB: Combo = (("Hbeta", 1.0),)
_HA: Combo = (("Halpha", 1.0),)
_N2: Combo = (("NII_6584", 1.0),)


@dataclass(frozen=True)
class DiagnosticDef:
    """Definition of one strong-line diagnostic.

    Attributes
    ----------
    name : str
        Diagnostic name (key of :data:`DIAGNOSTICS` and of the calibration TOML files).
    terms : tuple
        R = sum over terms of prod over factors of (linear combination) ** exponent;
        each term is a tuple of ``(combo, exponent)``.
    species : tuple of Combo
        The groups tested against the SNR thresholds (a doublet counts as one group).
    dust_sensitive : bool
        True when the lines span distant wavelengths, so that the ratio must be
        dust-corrected (|d log R / d E(B-V)| > 0.3 mag^-1 for CCM89; K20 §3.4).
    formula : str
        Human-readable definition.
    """

    name: str
    terms: tuple[tuple[tuple[Combo, int], ...], ...]
    species: tuple[Combo, ...]
    dust_sensitive: bool
    formula: str

    @property
    def lines(self) -> tuple[str, ...]:
        """Every line the definition involves (sorted by wavelength)."""
        names = {line for term in self.terms for combo, _ in term for line, _ in combo}
        return tuple(sorted(names, key=lambda n: LINES[n].wave_vac))

    @property
    def required_lines(self) -> tuple[str, ...]:
        """Lines that must be present in the maps ([OIII]4959 can be derived from 5007)."""
        return tuple(line for line in self.lines if line != "OIII_4959")


def _def(name: str, terms, species, dust: bool, formula: str) -> DiagnosticDef:
    return DiagnosticDef(name, tuple(tuple(t) for t in terms), tuple(species), dust, formula)


#: The diagnostics of C17/C20 (FACTS.md §1.2).
DIAGNOSTICS: dict[str, DiagnosticDef] = {
    d.name: d
    for d in (
        _def("R2", [[(_OII, 1), (_HB, -1)]], [_OII, _HB], True, "[OII]3727,29 / Hb"),
        _def("R3", [[(_O3, 1), (_HB, -1)]], [_O3, _HB], False, "[OIII]5007 / Hb"),
        _def("O3O2", [[(_O3, 1), (_OII, -1)]], [_O3, _OII], True, "[OIII]5007 / [OII]3727,29"),
        _def("R23", [[(_OII + _O3_BOTH, 1), (_HB, -1)]], [_OII, _O3, _HB], True,
             "([OII]3727,29 + [OIII]4959,5007) / Hb"),
        _def("N2", [[(_N2, 1), (_HA, -1)]], [_N2, _HA], False, "[NII]6584 / Ha"),
        _def("O3N2", [[(_O3, 1), (_HB, -1), (_N2, -1), (_HA, 1)]], [_O3, _HB, _N2, _HA], False,
             "([OIII]5007 / Hb) / ([NII]6584 / Ha)"),
        _def("S2", [[(_SII, 1), (_HA, -1)]], [_SII, _HA], False, "[SII]6717,31 / Ha"),
        _def("RS32", [[(_O3, 1), (_HB, -1)], [(_SII, 1), (_HA, -1)]], [_O3, _HB, _SII, _HA],
             False, "[OIII]5007 / Hb + [SII]6717,31 / Ha"),
        _def("O3S2", [[(_O3, 1), (_HB, -1), (_SII, -1), (_HA, 1)]], [_O3, _HB, _SII, _HA],
             False, "([OIII]5007 / Hb) / ([SII]6717,31 / Ha)"),
    )
}


def get_diagnostic(name: str) -> DiagnosticDef:
    """Return the :class:`DiagnosticDef` called ``name`` (ConfigError if unknown)."""
    if name not in DIAGNOSTICS:
        raise ConfigError(f"unknown diagnostic {name!r}; known: {sorted(DIAGNOSTICS)}")
    return DIAGNOSTICS[name]


def log_ratio_from_fluxes(diagnostic: str, fluxes: dict[str, np.ndarray]
                          ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """log10 R and its derivatives d log10 R / d log10 F_i from plain flux arrays.

    Parameters
    ----------
    diagnostic : str
        Key of :data:`DIAGNOSTICS`.
    fluxes : dict
        Line name -> flux array (all broadcastable). Every line of the definition is needed.

    Returns
    -------
    log_r : ndarray
        log10 R (NaN where R <= 0 or any input is not finite).
    jacobian : dict
        Line name -> d log10 R / d log10 F_line (dimensionless).

    References
    ----------
    FACTS.md §1.2.
    """
    definition = get_diagnostic(diagnostic)
    total = 0.0
    term_values = []
    for term in definition.terms:
        value = 1.0
        combo_values = []
        for combo, exponent in term:
            lin = sum(coef * np.asarray(fluxes[line], dtype=float) for line, coef in combo)
            combo_values.append(lin)
            value = value * lin**exponent
        term_values.append((value, combo_values))
        total = total + value
    with np.errstate(divide="ignore", invalid="ignore"):
        good = np.isfinite(total) & (total > 0)
        log_r = np.where(good, np.log10(np.where(good, total, 1.0)), np.nan)
        jacobian: dict[str, np.ndarray] = {}
        for term, (value, combo_values) in zip(definition.terms, term_values, strict=True):
            share = value / total  # fraction of R carried by this term
            for (combo, exponent), lin in zip(term, combo_values, strict=True):
                for line, coef in combo:
                    flux = np.asarray(fluxes[line], dtype=float)
                    contribution = share * exponent * coef * flux / lin
                    jacobian[line] = jacobian.get(line, 0.0) + contribution
    return log_r, jacobian


def k_of_line(line: str, *, law: str = "CCM89", r_v: float = R_V) -> float:
    """k(lambda) = A(lambda)/E(B-V) at the vacuum rest wavelength of a catalogue line."""
    from klever_nb.dust import k_lambda

    return float(k_lambda(LINES[line].wave_vac, law=law, r_v=r_v))


def oiii_4959_is_tied(maps: xr.Dataset, *, rtol: float = 1e-4) -> bool:
    """True when [OIII]4959 is absent or equals [OIII]5007 / OIII_RATIO in every finite pixel."""
    names = list(maps["line"].values)
    if "OIII_4959" not in names:
        return True
    if "OIII_5007" not in names:
        return False
    f49 = maps["flux"].sel(line="OIII_4959").values
    f50 = maps["flux"].sel(line="OIII_5007").values
    both = np.isfinite(f49) & np.isfinite(f50)
    if not both.any():
        return True
    return bool(np.allclose(f49[both], f50[both] / OIII_RATIO, rtol=rtol, atol=0.0))


def _line_arrays(maps: xr.Dataset, line: str, use_detected: bool = False
                 ) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    flux = maps["flux"].sel(line=line, drop=True).astype(float)
    err_name = "flux_err_stat" if "flux_err_stat" in maps else "flux_err"
    err = maps[err_name].sel(line=line, drop=True).astype(float)
    if "snr" in maps:
        snr = maps["snr"].sel(line=line, drop=True).astype(float)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = flux / err
    if "fit_ok" in maps and "line" in maps["fit_ok"].dims:
        snr = snr.where(maps["fit_ok"].sel(line=line, drop=True).astype(bool))
    if use_detected and "detected" in maps:
        snr = snr.where(maps["detected"].sel(line=line, drop=True).astype(bool))
    return flux, err, snr


def _pair_covariances(maps: xr.Dataset, definition: DiagnosticDef,
                      err: dict[str, xr.DataArray]) -> dict[tuple[str, str], xr.DataArray]:
    """Covariance of the two members of each summed doublet, from the fitter's ``pair_sum_err``.

    cov(F_a, F_b) = (σ_sum² − σ_a² − σ_b²) / 2 (clipped to the Cauchy–Schwarz bound). Pairs
    without ``pair_sum_err`` in the maps get none (independent errors).
    """
    out: dict[tuple[str, str], xr.DataArray] = {}
    if "pair_sum_err" not in maps:
        return out
    for species in definition.species:
        members = tuple(line for line, _ in species)
        if len(members) != 2 or not all(m in err for m in members):
            continue
        sigma_sum = maps["pair_sum_err"].sel(line=members[0], drop=True).astype(float)
        a, b = err[members[0]], err[members[1]]
        cov = 0.5 * (sigma_sum**2 - a**2 - b**2)
        bound = a * b
        out[members] = cov.clip(-bound, bound).fillna(0.0)
    return out


def _check_request(maps: xr.Dataset, definition: DiagnosticDef, *, oiii_4959: str,
                   ebv) -> tuple[list[str], bool]:
    """The maps' line names and whether they are already dust-corrected (ConfigError if unusable)."""
    names = list(maps["line"].values)
    missing = [line for line in definition.required_lines if line not in names]
    if missing:
        raise ConfigError(f"diagnostic {definition.name!r} needs lines {missing} that the maps "
                          f"lack (have {names}); choose another diagnostic")
    if oiii_4959 not in ("auto", "tied", "measured"):
        raise ConfigError(f"oiii_4959={oiii_4959!r}: use 'auto', 'tied' or 'measured'")
    already = bool(maps.attrs.get("dust_corrected", False))
    if already and ebv is not None:
        raise ConfigError("maps are already dust-corrected (attrs['dust_corrected']); "
                          "do not pass ebv again")
    return names, already


def _lines_to_read(maps: xr.Dataset, definition: DiagnosticDef, names: list[str], *,
                   oiii_4959: str, ebv, ebv_from_balmer) -> tuple[bool, list[str], list[str], bool]:
    """Which lines enter: ``(tied, involved, extra, use_balmer)`` (FACTS.md §1.2).

    ``tied``: [OIII]4959 enters as 5007 / OIII_RATIO; ``involved``: the measured lines of
    the ratio; ``extra``: Halpha/Hbeta read only for the Balmer E(B-V) chain rule
    (``use_balmer``).
    """
    tied = "OIII_4959" in definition.lines and (
        oiii_4959 == "tied" or (oiii_4959 == "auto" and oiii_4959_is_tied(maps)))
    if "OIII_4959" in definition.lines and not tied and "OIII_4959" not in names:
        raise ConfigError("oiii_4959='measured' but the maps have no OIII_4959 line")
    involved = [line for line in definition.lines if not (tied and line == "OIII_4959")]
    use_balmer = ebv is not None and ebv_from_balmer is not None and bool(
        np.any(np.asarray(ebv_from_balmer)))
    extra = [line for line in ("Halpha", "Hbeta") if use_balmer and line not in involved]
    if use_balmer and any(line not in names for line in extra):
        raise ConfigError("ebv_from_balmer needs Halpha and Hbeta in the maps")
    return tied, involved, extra, use_balmer


def _usable_species(definition: DiagnosticDef, flux: dict, err: dict, snr: dict,
                    pair_cov: dict, template: xr.DataArray, *, snr_min_strong: float,
                    snr_min_weak: float) -> xr.DataArray:
    """Finite positive fluxes and errors, each species (doublets summed) above its SNR cut (K20 §4.2)."""
    usable = xr.ones_like(template, dtype=bool)
    for species in definition.species:
        members = [line for line, _ in species]
        for line in members:
            usable = usable & np.isfinite(flux[line]) & (flux[line] > 0)
            usable = usable & np.isfinite(err[line]) & (err[line] > 0)
        threshold = snr_min_strong if any(m in STRONG_LINES for m in members) else snr_min_weak
        if len(members) == 1:
            species_snr = snr[members[0]]
        else:
            total = sum(flux[m] for m in members)
            noise = np.sqrt(sum(err[m] ** 2 for m in members)
                            + 2 * pair_cov.get(tuple(members), 0.0))
            with np.errstate(divide="ignore", invalid="ignore"):
                species_snr = total / noise
        usable = usable & (species_snr.fillna(-np.inf) >= threshold)
    return usable


def _log_flux_errors(flux: dict, err: dict, pair_cov: dict) -> tuple[dict, dict]:
    """sigma(log10 F) of every line and cov(log10 F_a, log10 F_b) of every fitted doublet pair."""
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_err = {line: err[line] / (np.abs(flux[line]) * LN10) for line in flux}  # sigma(log F)
        rel_cov = {pair: cov / (np.abs(flux[pair[0]]) * np.abs(flux[pair[1]]) * LN10**2)
                   for pair, cov in pair_cov.items()}  # cov(log F_a, log F_b)
    return rel_err, rel_cov


def _ratio_fluxes(flux: dict, err: dict, usable: xr.DataArray, definition: DiagnosticDef,
                  tied: bool, involved: list[str], template: xr.DataArray
                  ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Flux arrays of the ratio (NaN where unusable); [OIII]4959 = 5007 / OIII_RATIO where tied.

    Also returns where a measured 4959 was unusable and replaced by 5007 / OIII_RATIO
    (None unless 4959 is measured).
    """
    flux_values = {line: flux[line].where(usable) for line in involved}
    derived_4959 = None  # pixels where a measured 4959 is unusable: 5007/ratio instead
    if "OIII_4959" in definition.lines:
        if tied:
            flux_values["OIII_4959"] = flux_values["OIII_5007"] / OIII_RATIO
        else:
            f49 = flux_values["OIII_4959"]
            good49 = (np.isfinite(f49) & (f49 > 0) & np.isfinite(err["OIII_4959"])
                      & (err["OIII_4959"] > 0))
            flux_values["OIII_4959"] = f49.where(good49, flux_values["OIII_5007"] / OIII_RATIO)
            derived_4959 = ~good49.broadcast_like(template).values
    arrays = {line: xr.broadcast(value, template)[0] for line, value in flux_values.items()}
    return {n: a.values for n, a in arrays.items()}, derived_4959


def _fold_derived_4959(jac: dict, tied: bool, derived_4959: np.ndarray | None) -> None:
    """Move d log R / d log F(4959) onto 5007 where 4959 is 5007 / OIII_RATIO (fully correlated)."""
    if tied:  # 4959 = 5007/ratio: its derivative adds to 5007's (fully correlated)
        jac["OIII_5007"] = jac["OIII_5007"] + jac.pop("OIII_4959")
    elif derived_4959 is not None:
        jac["OIII_5007"] = jac["OIII_5007"] + np.where(derived_4959, jac["OIII_4959"], 0.0)
        jac["OIII_4959"] = np.where(derived_4959, 0.0, jac["OIII_4959"])


def _add_balmer_chain_rule(jac: dict, dust_slope: np.ndarray, balmer: np.ndarray,
                           log_r: np.ndarray, *, law: str, r_v: float) -> None:
    """Add d log R / d E(B-V) x d E(B-V) / d log F to Halpha/Hbeta where E(B-V) is Balmer."""
    c_balmer = 2.5 / (k_of_line("Hbeta", law=law, r_v=r_v)
                      - k_of_line("Halpha", law=law, r_v=r_v))
    for line in ("Halpha", "Hbeta"):
        jac.setdefault(line, np.zeros_like(log_r))
    sign = {"Halpha": 1.0, "Hbeta": -1.0}
    for line in ("Halpha", "Hbeta"):
        jac[line] = jac[line] + np.where(balmer, dust_slope * c_balmer * sign[line], 0.0)


def _flux_variance(jac: dict, rel_err: dict, rel_cov: dict, template: xr.DataArray,
                   log_r: np.ndarray) -> np.ndarray:
    """First-order variance of log10 R from the flux errors and doublet covariances."""
    variance = np.zeros_like(log_r)
    with np.errstate(divide="ignore", invalid="ignore"):
        for line, derivative in jac.items():
            rel = rel_err[line].broadcast_like(template).values
            variance = variance + np.where(derivative == 0, 0.0, derivative * rel) ** 2
        for (a, b), cov in rel_cov.items():
            if a in jac and b in jac:
                cross = 2 * jac[a] * jac[b] * cov.broadcast_like(template).values
                variance = variance + np.nan_to_num(cross)
    return variance


def observed_log_ratio(
    maps: xr.Dataset,
    diagnostic: str,
    *,
    snr_min_strong: float = METALLICITY_SNR_STRONG,
    snr_min_weak: float = METALLICITY_SNR_WEAK,
    ebv: xr.DataArray | float | None = None,
    ebv_err: xr.DataArray | float | None = None,
    ebv_from_balmer: xr.DataArray | bool | None = None,
    oiii_4959: str = "auto",
    use_detected: bool = False,
    law: str = "CCM89",
    r_v: float = R_V,
) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Observed log10 of a diagnostic ratio, its 1-sigma error in dex, and where it is usable.

    Works on any line-map Dataset with a ``line`` dimension (image plane
    ``(line, y, x)``, source plane ``(line, ys, xs)`` or integrated ``(line,)``).

    Parameters
    ----------
    maps : xarray.Dataset
        ``flux``, ``flux_err`` (1 sigma), optionally ``snr`` (used for the
        thresholds instead of flux/flux_err), ``fit_ok`` (False = unusable) and
        ``detected``. If
        ``maps.attrs["dust_corrected"]`` is true (output of
        :func:`klever_nb.dust.correct_for_dust`), the stored ``ebv_err`` enters
        the error as a term correlated between the lines of the ratio.
    diagnostic : str
        Key of :data:`DIAGNOSTICS`.
    snr_min_strong, snr_min_weak : float
        SNR thresholds for Halpha/[OIII]5007 and for the other lines (K20 §4.2).
    ebv, ebv_err : DataArray or float, optional
        Apply the dust correction F * 10**(0.4 k E) before taking the ratio (and
        propagate ``ebv_err``). NaN E(B-V) makes the ratio unusable there.
    ebv_from_balmer : DataArray or bool, optional
        Where true, ``ebv`` is the Balmer decrement of the same pixel's Halpha and
        Hbeta; its error is then propagated exactly through the chain rule (the
        Hbeta that sits in R2/R23 and in E(B-V) is the same measurement) and
        ``ebv_err`` is ignored there.
    use_detected : bool
        Also require the fitter's ``detected`` flag. Off by default: the fitter
        flags detections at SNR > 3 (K20 §3.1), which would override the 2.5
        threshold of the weak lines (K20 §4.2).
    oiii_4959 : {"auto", "tied", "measured"}
        How [OIII]4959 enters R23: "tied" uses 5007/OIII_RATIO (correlated),
        "measured" the fitted 4959 flux, "auto" detects a tie
        (:func:`oiii_4959_is_tied`). Where a measured 4959 is not finite or not
        positive, 5007/OIII_RATIO replaces it in that pixel.
    law, r_v : str, float
        Extinction law for the dust correction.

    Returns
    -------
    log_r, log_r_err : xarray.DataArray
        log10 R and its 1-sigma error (dex), first-order propagation:
        sigma^2 = sum_i (d log R / d log F_i)^2 (sigma_i / (F_i ln 10))^2 (+ dust term).
        NaN where not usable.
    usable : xarray.DataArray of bool
        All lines finite, positive, with positive finite errors and above their SNR threshold.

    References
    ----------
    FACTS.md §1.2, §5; K20 §3.4, §4.2, eq. (1).

    Examples
    --------
    >>> import xarray as xr
    >>> maps = xr.Dataset({"flux": ("line", [3.0, 1.0]), "flux_err": ("line", [0.1, 0.1])},
    ...                   coords={"line": ["OIII_5007", "Hbeta"]})
    >>> float(observed_log_ratio(maps, "R3")[0].round(4))
    0.4771
    """
    definition = get_diagnostic(diagnostic)
    names, already = _check_request(maps, definition, oiii_4959=oiii_4959, ebv=ebv)
    tied, involved, extra, use_balmer = _lines_to_read(
        maps, definition, names, oiii_4959=oiii_4959, ebv=ebv, ebv_from_balmer=ebv_from_balmer)

    flux, err, snr = {}, {}, {}
    for line in involved + extra:
        flux[line], err[line], snr[line] = _line_arrays(maps, line, use_detected)
    template = flux[involved[0]]
    pair_cov = _pair_covariances(maps, definition, err)
    usable = _usable_species(definition, flux, err, snr, pair_cov, template,
                             snr_min_strong=snr_min_strong, snr_min_weak=snr_min_weak)
    rel_err, rel_cov = _log_flux_errors(flux, err, pair_cov)

    # --- dust correction of the fluxes that enter the ratio (relative errors unchanged)
    k = {line: k_of_line(line, law=law, r_v=r_v) for line in involved + (
        ["OIII_4959"] if tied else [])}
    if ebv is not None:
        ebv_arr = xr.DataArray(ebv) if np.isscalar(ebv) else ebv
        for line in involved:
            flux[line] = flux[line] * 10.0 ** (0.4 * k[line] * ebv_arr)
        usable = usable & np.isfinite(ebv_arr)

    values, derived_4959 = _ratio_fluxes(flux, err, usable, definition, tied, involved, template)
    log_r_np, jac = log_ratio_from_fluxes(diagnostic, values)
    _fold_derived_4959(jac, tied, derived_4959)

    # --- error propagation in log space
    dust_slope = sum(jac[line] * k[line] for line in jac) * 0.4  # d log R / d E(B-V)
    if use_balmer:
        balmer = np.broadcast_to(np.asarray(
            ebv_from_balmer.values if isinstance(ebv_from_balmer, xr.DataArray)
            else ebv_from_balmer, dtype=bool), log_r_np.shape)
        _add_balmer_chain_rule(jac, dust_slope, balmer, log_r_np, law=law, r_v=r_v)
    variance = _flux_variance(jac, rel_err, rel_cov, template, log_r_np)
    if ebv is not None and ebv_err is not None:
        sig_e = np.broadcast_to(np.asarray(
            ebv_err.broadcast_like(template).values if isinstance(ebv_err, xr.DataArray)
            else ebv_err, dtype=float), log_r_np.shape)
        if use_balmer:
            sig_e = np.where(balmer, 0.0, sig_e)
        variance = variance + (dust_slope * sig_e) ** 2
    if already and "ebv_err" in maps:
        sig_e = maps["ebv_err"].broadcast_like(template).values
        variance = variance + (dust_slope * np.nan_to_num(sig_e)) ** 2

    dims = template.dims
    usable_np = usable.broadcast_like(template).values & np.isfinite(log_r_np) & np.isfinite(
        variance)
    log_r = xr.DataArray(np.where(usable_np, log_r_np, np.nan), dims=dims, coords=template.coords)
    log_r_err = xr.DataArray(np.where(usable_np, np.sqrt(variance), np.nan), dims=dims,
                             coords=template.coords)
    log_r.attrs.update(units="dex", long_name=f"log10 {diagnostic}", formula=definition.formula)
    log_r_err.attrs.update(units="dex", long_name=f"1-sigma error of log10 {diagnostic}")
    usable_da = xr.DataArray(usable_np, dims=dims, coords=template.coords)
    return log_r, log_r_err, usable_da


def balmer_dust_slope(diagnostic: str, *, law: str = "CCM89", r_v: float = R_V,
                      fluxes: dict[str, float] | None = None) -> float:
    """d log10 R / d E(B-V) of a diagnostic (for simple ratios 0.4 (k_num - k_den)).

    ``fluxes`` sets the relative line fluxes for the non-trivial definitions (R23,
    RS32); defaults to equal fluxes.
    """
    definition = get_diagnostic(diagnostic)
    values = {line: 1.0 for line in definition.lines}
    if fluxes:
        values.update(fluxes)
    _, jac = log_ratio_from_fluxes(diagnostic, values)
    return float(0.4 * sum(jac[line] * k_of_line(line, law=law, r_v=r_v) for line in jac))


__all__ = [
    "DIAGNOSTICS", "DiagnosticDef", "STRONG_LINES", "balmer_dust_slope",
    "get_diagnostic", "log_ratio_from_fluxes", "observed_log_ratio", "oiii_4959_is_tied",
]
