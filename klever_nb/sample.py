"""Sample science on the sample table (K20 §4.1, §4.3, §4.4): pure functions, no files
except the literature tables shipped as package data.

- :func:`speagle14_sfms`, :func:`delta_sfms`: the star-forming main sequence of Speagle et al.
  (2014) at each galaxy's redshift and the distance from it (K20 Figs 6 and 10).
- :func:`demagnify_log_mstar`: stellar masses from the galaxy TOML ``[properties]`` corrected
  for lensing magnification when they are not yet (K20 §3.3).
- :func:`mzr_curti20`, :func:`mzr_offset`: placement on the local mass–metallicity relation
  K20 compares with (Fig. 6, "Curti et al. 2019" = Curti et al. 2020a, MNRAS 491, 944).
- :func:`regress`: robust linear regression of gradient vs sSFR / M* / ΔSFMS with bootstrap
  errors, RMS and Spearman ρ with its p-value (K20 §4.4, Figs 9 and 10).
- :func:`load_literature`, :func:`k20_table`, :func:`derive`: one table of published
  gradients; the K20 rows the paper prints; derived columns of a sample table.

Units: masses log10(M*/M⊙); SFR M⊙/yr (log10 where the name says ``log_``); sSFR
log10(yr⁻¹); gradients dex/kpc.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

#: Speagle+14 cosmology (their §2): H0 = 70 km/s/Mpc, Ωm = 0.3, ΩΛ = 0.7 (FACTS.md §3).
SPEAGLE14_H0, SPEAGLE14_OM0 = 70.0, 0.3

#: Speagle+14 eq. 28 best fit: log SFR = (a - b t) log M* - (c - d t), with 1σ errors.
SPEAGLE14 = {"a": (0.84, 0.02), "b": (0.026, 0.003), "c": (6.51, 0.24), "d": (0.11, 0.03)}

#: SFR Kroupa -> Chabrier: divide by 1.06 (K20 §3.3; FACTS.md §4).
KROUPA_TO_CHABRIER_SFR_DEX = -np.log10(1.06)

#: Intrinsic scatter K20 draws around the Speagle+14 SFMS (Fig. 6): 0.2 dex.
SFMS_SCATTER_DEX = 0.2

#: Local MZR of Curti et al. 2020a (MNRAS 491, 944; "Curti et al. 2019" in K20), their eq. 5
#: fitted to SDSS stacks on the C17/C20 T_e-anchored scale, Chabrier IMF:
#: 12+log(O/H) = Z0 - (γ/β) log10(1 + (M*/M0)^-β). Values as published there (Z0 = 8.793,
#: log M0 = 10.02, γ = 0.28, β = 1.2, the fit quoted in that paper's abstract; a second
#: developer's independent recollection agrees). Not in FACTS.md: check against the paper
#: when it can be read.
CURTI20_MZR = {"z0": 8.793, "log_m0": 10.02, "gamma": 0.28, "beta": 1.2}

#: Slope d(12+log O/H)/dN2 of the Pettini & Pagel (2004) N2 calibration that Wuyts+16 use to
#: turn their N2 gradients into O/H gradients.
PP04_N2_SLOPE = 0.57

#: Regression estimators (scikit-learn). K20 §4.4: "We exploited the sklearn python package to
#: perform a robust linear regression"; the estimator is not named. HuberRegressor is the
#: default here: it keeps every point (an M-estimator that down-weights large residuals
#: instead of discarding them, unlike RANSAC), it is deterministic (unlike RANSAC), and it
#: is sklearn's documented "robust to outliers" linear model; Theil–Sen is offered for
#: comparison (scipy's exact median of pairwise slopes). Both recover the paper's Fig. 9 slopes from the tables available here
#: (tests/test_sample.py).
ESTIMATORS = ("huber", "theilsen", "ols")


# ---------------------------------------------------------------------------
# SFMS and stellar masses
# ---------------------------------------------------------------------------
def universe_age_gyr(z, *, h0: float = SPEAGLE14_H0, om0: float = SPEAGLE14_OM0) -> np.ndarray:
    """Age of the Universe at ``z`` (Gyr) in a flat ΛCDM (default: Speagle+14's cosmology).

    Examples
    --------
    >>> round(float(universe_age_gyr(2.0)), 3)
    3.227
    """
    from astropy.cosmology import FlatLambdaCDM

    return np.asarray(FlatLambdaCDM(H0=h0, Om0=om0).age(np.asarray(z, dtype=float)).value)


def speagle14_sfms(log_mstar, z, *, imf: str = "kroupa") -> np.ndarray:
    """log SFR (M⊙/yr) of the Speagle et al. (2014) main sequence at ``log_mstar`` and ``z``.

    log SFR = (0.84 − 0.026 t) log M* − (6.51 − 0.11 t), t the age of the Universe in Gyr
    computed in Speagle's cosmology (H0 = 70, Ωm = 0.3, ΩΛ = 0.7). Speagle+14 use a Kroupa
    IMF. ``imf="kroupa"`` (default) leaves the relation as published, which is what K20 does
    ("converting to a Chabrier IMF introduces negligible effects", §4.1); ``"chabrier"``
    shifts the SFR by −log10(1.06) = −0.025 dex (K20 §3.3). The stellar-mass IMF difference
    (≲0.03 dex) is not applied.

    Examples
    --------
    >>> round(float(speagle14_sfms(9.0, 2.0)), 3), round(float(speagle14_sfms(10.0, 2.0)), 3)
    (0.65, 1.406)
    """
    if imf not in ("kroupa", "chabrier"):
        raise ValueError(f"imf must be 'kroupa' or 'chabrier', got {imf!r}")
    t = universe_age_gyr(z)
    p = {k: v[0] for k, v in SPEAGLE14.items()}
    log_sfr = (p["a"] - p["b"] * t) * np.asarray(log_mstar, float) - (p["c"] - p["d"] * t)
    return log_sfr + (KROUPA_TO_CHABRIER_SFR_DEX if imf == "chabrier" else 0.0)


def speagle14_slope(z) -> np.ndarray:
    """d log SFR / d log M* of the Speagle+14 SFMS at ``z``."""
    return SPEAGLE14["a"][0] - SPEAGLE14["b"][0] * universe_age_gyr(z)


def log_with_error(value, err) -> tuple[np.ndarray, np.ndarray]:
    """log10 of a positive quantity and its first-order error err / (value ln 10)."""
    value = np.asarray(value, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(value > 0, np.log10(np.where(value > 0, value, 1.0)), np.nan)
        out_err = np.asarray(err, float) / (value * np.log(10))
    return out, out_err


def delta_sfms(log_sfr, log_mstar, z, *, log_sfr_err=0.0, log_mstar_err=0.0,
               imf: str = "kroupa") -> tuple[np.ndarray, np.ndarray]:
    """Distance from the Speagle+14 SFMS at each redshift, ΔSFMS = log SFR − SFMS(M*, z).

    The error propagates the SFR and M* errors (the M* error through the SFMS slope at
    that redshift): σ² = σ_logSFR² + (slope σ_logM*)². The SFMS intrinsic scatter (0.2 dex)
    is not added: it is what ΔSFMS measures.

    Examples
    --------
    >>> d, e = delta_sfms(1.406, 10.0, 2.0, log_sfr_err=0.1, log_mstar_err=0.0)
    >>> round(float(d), 3) + 0.0, round(float(e), 3)
    (0.0, 0.1)
    """
    delta = np.asarray(log_sfr, float) - speagle14_sfms(log_mstar, z, imf=imf)
    slope = speagle14_slope(z)
    err = np.hypot(np.asarray(log_sfr_err, float), slope * np.asarray(log_mstar_err, float))
    return delta, err


def demagnify_log_mstar(log_mstar, log_mstar_err, mu, mu_err=0.0, *,
                        corrected=False) -> tuple[np.ndarray, np.ndarray]:
    """Intrinsic stellar mass: log M* − log μ where not ``corrected`` yet (K20 §3.3).

    K20 fits SEDs to magnified photometry and divides by μ(Hα) (μ_maps when μ(Hα) is not
    available); the statistical μ error enters the mass error in quadrature. Where
    ``corrected`` is true (element-wise) or μ is not finite (unlensed: μ = 1), the mass is
    returned unchanged.

    Examples
    --------
    >>> m, e = demagnify_log_mstar(10.0, 0.1, 10.0, 0.0)
    >>> round(float(m), 3), round(float(e), 3)
    (9.0, 0.1)
    """
    log_mstar = np.asarray(log_mstar, float)
    err = np.asarray(log_mstar_err, float)
    mu = np.asarray(mu, float)
    apply = ~np.asarray(corrected, bool) & np.isfinite(mu) & (mu > 0)
    safe_mu = np.where(apply, mu, 1.0)
    mu_term = np.where(apply, np.asarray(mu_err, float) / (safe_mu * np.log(10)), 0.0)
    mu_term = np.where(np.isfinite(mu_term), mu_term, 0.0)
    return log_mstar - np.log10(safe_mu), np.hypot(err, mu_term)


# ---------------------------------------------------------------------------
# MZR
# ---------------------------------------------------------------------------
def mzr_curti20(log_mstar) -> np.ndarray:
    """Local MZR of Curti et al. 2020a (K20's "Curti et al. 2019"), 12+log(O/H) at log M*.

    Examples
    --------
    >>> round(float(mzr_curti20(10.02)), 3)  # Z0 - (γ/β) log10(2) at M* = M0
    8.723
    """
    p = CURTI20_MZR
    x = np.asarray(log_mstar, float) - p["log_m0"]
    return p["z0"] - p["gamma"] / p["beta"] * np.log10(1 + 10 ** (-p["beta"] * x))


def mzr_offset(oh, log_mstar) -> np.ndarray:
    """Metallicity offset from the local MZR at fixed mass (K20 §4.1: −0.25 / −0.36 dex at
    z ~ 1.4 / 2.2)."""
    return np.asarray(oh, float) - mzr_curti20(log_mstar)


# ---------------------------------------------------------------------------
# Regression and correlation
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Regression:
    """Result of :func:`regress` (slope in units of y per unit of x)."""

    slope: float
    slope_err: float
    intercept: float
    intercept_err: float
    rms: float
    spearman_rho: float
    spearman_p: float
    n: int
    estimator: str
    x_pivot: float

    @property
    def significance_sigma(self) -> float:
        """|slope| / error."""
        return abs(self.slope) / self.slope_err if self.slope_err > 0 else np.inf

    def predict(self, x) -> np.ndarray:
        """The fitted line at ``x``."""
        return self.intercept + self.slope * np.asarray(x, float)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["significance_sigma"] = self.significance_sigma
        return out


def _fit_line(x: np.ndarray, y: np.ndarray, estimator: str, seed: int) -> tuple[float, float]:
    if estimator == "ols":
        slope, intercept = np.polyfit(x, y, 1)
        return float(slope), float(intercept)
    if estimator == "theilsen":  # scipy's exact Theil-Sen (median of pairwise slopes)
        from scipy import stats

        res = stats.theilslopes(y, x)
        return float(res.slope), float(res.intercept)
    if estimator != "huber":
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    from sklearn.linear_model import HuberRegressor

    # standardised variables: the same line, ~6x faster and better conditioned for L-BFGS
    x0, xs = float(np.mean(x)), float(np.std(x)) or 1.0
    ys = float(np.std(y)) or 1.0
    model = HuberRegressor(max_iter=1000).fit(((x - x0) / xs)[:, None], y / ys)
    slope = float(model.coef_[0]) * ys / xs
    return slope, float(model.intercept_) * ys - slope * x0


def regress(x, y, *, estimator: str = "huber", n_boot: int = 300, seed: int = 0) -> Regression:
    """Robust straight line y = a + b x with bootstrap errors, RMS and Spearman ρ (K20 §4.4).

    Parameters
    ----------
    x, y : array_like
        Non-finite pairs are dropped.
    estimator : {"huber", "theilsen", "ols"}
        See :data:`ESTIMATORS` (default Huber).
    n_boot : int
        Bootstrap resamples (pairs drawn with replacement) for the slope/intercept errors.
    seed : int
        Seed of the bootstrap (and of Theil–Sen's subsampling).

    Returns
    -------
    Regression
        ``rms`` is the root-mean-square of the residuals about the fit (K20's grey band);
        ``spearman_rho``/``spearman_p`` from :func:`scipy.stats.spearmanr` (two-sided).
    """
    from scipy import stats

    x = np.asarray(x, float)
    y = np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3:
        raise ValueError(f"regress needs at least 3 finite (x, y) pairs, got {x.size}")
    pivot = float(np.median(x))
    slope, intercept = _fit_line(x, y, estimator, seed)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(int(n_boot)):
        idx = rng.integers(0, x.size, x.size)
        if np.ptp(x[idx]) == 0:
            continue
        boots.append(_fit_line(x[idx], y[idx], estimator, seed))
    boots_arr = np.asarray(boots) if boots else np.full((1, 2), np.nan)
    rms = float(np.sqrt(np.mean((y - (intercept + slope * x)) ** 2)))
    rho = stats.spearmanr(x, y)
    return Regression(slope=slope, slope_err=float(np.std(boots_arr[:, 0], ddof=1)),
                      intercept=intercept, intercept_err=float(np.std(boots_arr[:, 1], ddof=1)),
                      rms=rms, spearman_rho=float(rho.statistic), spearman_p=float(rho.pvalue),
                      n=int(x.size), estimator=estimator, x_pivot=pivot)


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------
def _data(*parts: str):
    return resources.files("klever_nb").joinpath("data", "literature", *parts)


@lru_cache(maxsize=1)
def _k20_raw():
    import pandas as pd

    with _data("curti2020_tables", "k20_tables_2_3_4.csv").open() as handle:
        return pd.read_csv(handle)


def k20_table():
    """The K20 Table 2–4 rows the journal prints (6 galaxies), as a sample-like table.

    Columns follow the sample table of ``klever-nb sample`` (``name``, ``redshift``,
    ``sfr``, ``sfr_err``, ``gradient_dex_per_kpc``, ``gradient_err``, ``resolved``,
    ``global_oh``, ``mu_halpha`` …, ``prop_log_mstar``, ``prop_log_mstar_err``) plus
    ``mstar_mu_corrected = True`` (K20 Table 3 masses are already de-magnified) and
    ``origin = "K20 Tables 2-4"``.
    """
    raw = _k20_raw()
    table = raw.rename(columns={"galaxy": "name", "z": "redshift",
                                "gradient": "gradient_dex_per_kpc", "log_mstar": "prop_log_mstar",
                                "log_mstar_err": "prop_log_mstar_err"}).copy()
    table["lensed"] = True
    table["mstar_mu_corrected"] = True
    table["origin"] = "K20 Tables 2-4"
    table["global_oh_err_mean"] = 0.5 * (table["global_oh_err_lo"] + table["global_oh_err_hi"])
    table["status"] = "paper"
    return table


def _kurvs(folder: str, filename: str):
    import pandas as pd

    with _data(folder, filename).open() as handle:
        return pd.read_csv(handle)


#: The digitised gradient-vs-redshift sets: folder, file, survey, method, lensed.
_KURVS_SETS = (
    ("curti2020_grad_vs_z_kurvs", "CurtiMGz.csv", "KLEVER (Curti+20, digitised)",
     "R3+N2/S2/O3O2, C17/C20", True),
    ("queyrel2012_grad_vs_z_kurvs", "QueyrelMGz.csv", "Queyrel+12", "N2 (SINFONI)", False),
    ("swinbank2012_grad_vs_z_kurvs", "SwinbankMGz.csv", "Swinbank+12", "N2 (AO IFU)", False),
    ("leethochawalit2016_grad_vs_z_kurvs", "LeethochawalitMGz.csv", "Leethochawalit+16",
     "N2 (OSIRIS AO, lensed)", True),
    ("wang2017_grad_vs_z_kurvs", "Wang17MGz.csv", "Wang+17", "grism (GLASS, lensed)", True),
    ("wang2019_grad_vs_z_kurvs", "Wang19MGz.csv", "Wang+19", "grism (GLASS, lensed)", True),
)


def wuyts16_table(*, beam_smearing_corrected: bool = False):
    """Wuyts+16 KMOS3D table 3 rows with a gradient, as O/H gradients.

    Their N2 gradients times the PP04 N2 slope 0.57 (:data:`PP04_N2_SLOPE`, as Wuyts+16
    convert); ``beam_smearing_corrected`` multiplies by their BCF. The default is the
    observed gradient, which is what reproduces K20's Fig. 9 numbers (tests/test_sample.py).
    """
    import pandas as pd

    with _data("wuyts2016_vizier_patricio", "wuyts2016_table3.csv").open() as handle:
        raw = pd.read_csv(handle)
    raw = raw[np.isfinite(raw["dN2dr"])]
    factor = raw["BCF"].fillna(1.0) if beam_smearing_corrected else 1.0
    out = pd.DataFrame({
        "name": "W16-" + raw["Seq"].astype(str), "survey": "Wuyts+16 (KMOS3D)",
        "redshift": raw["z"], "gradient_dex_per_kpc": PP04_N2_SLOPE * raw["dN2dr"] * factor,
        "gradient_err": PP04_N2_SLOPE * raw["e_dN2dr"] * factor,
        "method": "N2 gradient x 0.57 (PP04)", "lensed": False,
        "log_mstar": raw["logMstar"], "log_sfr": np.log10(raw["SFR"].where(raw["SFR"] > 0)),
        "source": "VizieR J/ApJ/827/74 table 3"})
    return out.reset_index(drop=True)


def carton18_table():
    """Carton+18 MUSE table A1 (0.1 < z < 0.8) gradients, without the 'Unreliable' ones."""
    import pandas as pd

    with _data("carton2018_vizier_patricio", "carton2018_tablea1.csv").open() as handle:
        raw = pd.read_csv(handle)
    raw = raw[raw["Grad"] != "Unreliable"]
    return pd.DataFrame({
        "name": "C18-" + raw["Field"].astype(str) + "-" + raw["ID"].astype(str),
        "survey": "Carton+18 (MUSE)", "redshift": raw["z"],
        "gradient_dex_per_kpc": raw["dlogZ"],
        "gradient_err": 0.5 * (raw["B_dlogZ"] - raw["b_dlogZ"]),
        "method": "photoionisation model fit (MUSE)", "lensed": False,
        "log_mstar": raw["Mass"], "log_sfr": raw["SFR"],
        "source": "VizieR J/MNRAS/478/4293 table A1"}).reset_index(drop=True)


def load_literature():
    """Every shipped literature gradient in one table.

    Columns: ``survey``, ``redshift``, ``gradient_dex_per_kpc``, ``gradient_err`` (NaN for
    digitised points), ``method``, ``lensed``, ``log_mstar``, ``log_sfr`` (NaN where the
    source has none), ``source`` (VizieR table, digitised figure, K20 table), ``name``.
    """
    import pandas as pd

    frames = []
    for folder, filename, survey, method, lensed in _KURVS_SETS:
        raw = _kurvs(folder, filename)
        frames.append(pd.DataFrame({
            "name": [f"{survey.split()[0]}-{i}" for i in range(len(raw))], "survey": survey,
            "redshift": raw["x"], "gradient_dex_per_kpc": raw["y"], "gradient_err": np.nan,
            "method": method, "lensed": lensed, "log_mstar": np.nan, "log_sfr": np.nan,
            "source": f"digitised figure (zidianjun/kurvs {filename})"}))
    frames.append(wuyts16_table())
    frames.append(carton18_table())
    k20 = k20_table()
    frames.append(pd.DataFrame({
        "name": k20["name"], "survey": "KLEVER (K20 tables)", "redshift": k20["redshift"],
        "gradient_dex_per_kpc": k20["gradient_dex_per_kpc"], "gradient_err": k20["gradient_err"],
        "method": k20["diagnostics"] + ", C17/C20", "lensed": True,
        "log_mstar": k20["prop_log_mstar"], "log_sfr": np.log10(k20["sfr"]),
        "source": "K20 Tables 2-4 (transcribed)"}))
    return pd.concat(frames, ignore_index=True)


def _column(table, name: str, default=np.nan) -> np.ndarray:
    if name in table:
        return np.asarray(table[name])
    return np.full(len(table), default)


def derive(table, *, mstar_corrected=None, imf: str = "kroupa"):
    """Add the sample-science columns to a sample table (``klever-nb sample`` or
    :func:`k20_table`); returns a new :class:`pandas.DataFrame`.

    Added: ``log_mstar``, ``log_mstar_err`` (de-magnified with ``mu_halpha`` when the
    masses in ``[properties]`` are not corrected yet: per galaxy from the property
    ``mstar_mu_corrected`` (1/0) or the column of that name; ``mstar_corrected`` overrides;
    default not corrected, i.e. SED masses of magnified photometry as K20 §3.3 starts from),
    ``log_sfr``, ``log_sfr_err``, ``log_ssfr``, ``log_ssfr_err`` (yr⁻¹), ``sfms_log_sfr``,
    ``delta_sfms``, ``delta_sfms_err``, ``mzr_oh``, ``mzr_offset``. SFRs in the table are
    already corrected for magnification (the pipeline's and K20's).
    """
    import pandas as pd

    out = pd.DataFrame(table).copy()
    z = _column(out, "redshift").astype(float)
    mu = _column(out, "mu_halpha").astype(float)
    mu = np.where(out.get("lensed", pd.Series(True, index=out.index)).astype(bool), mu, np.nan)
    mu_err = _column(out, "mu_halpha_err", 0.0).astype(float)
    if mstar_corrected is not None:
        corrected = np.broadcast_to(np.asarray(mstar_corrected, bool), (len(out),))
    elif "mstar_mu_corrected" in out:
        corrected = out["mstar_mu_corrected"].fillna(False).astype(bool).to_numpy()
    elif "prop_mstar_mu_corrected" in out:
        corrected = out["prop_mstar_mu_corrected"].fillna(0).astype(float).to_numpy() > 0
    else:
        corrected = np.zeros(len(out), bool)
    log_m, log_m_err = demagnify_log_mstar(
        _column(out, "prop_log_mstar").astype(float),
        np.nan_to_num(_column(out, "prop_log_mstar_err", 0.0).astype(float)),
        mu, np.nan_to_num(mu_err), corrected=corrected)
    out["log_mstar"], out["log_mstar_err"] = log_m, log_m_err
    log_sfr, log_sfr_err = log_with_error(_column(out, "sfr"), _column(out, "sfr_err", 0.0))
    out["log_sfr"], out["log_sfr_err"] = log_sfr, log_sfr_err
    out["log_ssfr"] = log_sfr - log_m
    out["log_ssfr_err"] = np.hypot(log_sfr_err, log_m_err)
    out["sfms_log_sfr"] = speagle14_sfms(log_m, z, imf=imf)
    out["delta_sfms"], out["delta_sfms_err"] = delta_sfms(
        log_sfr, log_m, z, log_sfr_err=log_sfr_err, log_mstar_err=log_m_err, imf=imf)
    out["mzr_oh"] = mzr_curti20(log_m)
    out["mzr_offset"] = mzr_offset(_column(out, "global_oh").astype(float), log_m)
    return out


def correlation_sample(table=None, *, z_min: float = 0.8, include_literature: bool = True,
                       literature=None):
    """The Fig. 9/10 sample: the given (derived) KLEVER rows plus the literature at z ≥ 0.8
    that has M* and SFR (K20 §4.4: "previous works at z ≳ 0.8").

    Returns a table with ``survey``, ``redshift``, ``gradient_dex_per_kpc``,
    ``gradient_err``, ``log_mstar``, ``log_sfr``, ``log_ssfr``, ``delta_sfms``, ``origin``
    (``"this run"``, ``"K20 tables"`` or ``"literature"``).
    """
    import pandas as pd

    frames = []
    if table is not None:
        d = derive(table) if "log_ssfr" not in table else pd.DataFrame(table)
        origin = d["origin"] if "origin" in d else "this run"
        frames.append(pd.DataFrame({
            "name": d["name"], "survey": np.where(pd.Series(origin).eq("this run"), "this run",
                                                   "KLEVER (K20 tables)"),
            "redshift": d["redshift"], "gradient_dex_per_kpc": d["gradient_dex_per_kpc"],
            "gradient_err": d["gradient_err"], "log_mstar": d["log_mstar"],
            "log_sfr": d["log_sfr"], "resolved": d.get("resolved", "resolved"),
            "origin": np.where(pd.Series(origin).eq("this run"), "this run", "K20 tables")}))
    if include_literature:
        lit = literature if literature is not None else load_literature()
        lit = lit[(lit["survey"] != "KLEVER (K20 tables)") & (lit["redshift"] >= z_min)
                  & np.isfinite(lit["log_mstar"]) & np.isfinite(lit["log_sfr"])]
        frames.append(lit.assign(origin="literature", resolved="resolved")[
            ["name", "survey", "redshift", "gradient_dex_per_kpc", "gradient_err", "log_mstar",
             "log_sfr", "resolved", "origin"]])
    out = pd.concat(frames, ignore_index=True)
    out["log_ssfr"] = out["log_sfr"] - out["log_mstar"]
    out["delta_sfms"] = out["log_sfr"] - speagle14_sfms(out["log_mstar"], out["redshift"])
    return out


def correlations(sample, *, estimator: str = "huber", n_boot: int = 300,
                 seed: int = 0) -> dict[str, Regression]:
    """Gradient vs log sSFR, log M* and ΔSFMS regressions of a :func:`correlation_sample`."""
    y = np.asarray(sample["gradient_dex_per_kpc"], float)
    return {key: regress(np.asarray(sample[key], float), y, estimator=estimator,
                         n_boot=n_boot, seed=seed)
            for key in ("log_ssfr", "log_mstar", "delta_sfms")}
