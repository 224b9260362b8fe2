"""Simulating a large deployment: train on this run's cohort, noise as a big one would.

A research simulation cannot sample 10^6 users, but the noise that deployment
would add is known: with cohorts of m_big users and noise multiplier z, the
noise on the *mean* update has std z_delta * C / m_big. McMahan et al. 2018
("Learning Differentially Private Recurrent Language Models", section 3)
simulate it by training with a smaller cohort m and scaling the noise on the
sum by m / m_big, so that the noise on the mean is the big cohort's; pfl-research
calls this `noise_cohort_size`. The accountant then charges the deployment that
is simulated: N_big users, Poisson q = m_big / N_big (or fixed m_big of N_big),
z, the rounds run.

Such a run is NOT itself private: its real cohort of m gets m_big / m times
less noise than its sensitivity needs. The log and privacy.md say so first.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpfl_app.errors import ConfigError


@dataclass(frozen=True)
class Deployment:
    """What the accountant and the noise calibration see, and how the noise is scaled."""

    population: int  # N: the real population, or the simulated N_big
    clients_per_round: int  # m the noise is calibrated to: real m, or m_big
    noise_scale: float  # multiplies the noise on the real cohort's sum: m / m_big
    real_population: int
    real_clients_per_round: int

    @property
    def simulated(self) -> bool:
        return self.population != self.real_population or self.noise_scale != 1.0

    def summary(self) -> str:
        """One sentence for the log and the first line of privacy.md."""
        return (f"SIMULATION, not itself private: this run trained N = {self.real_population} "
                f"clients with cohorts of m = {self.real_clients_per_round}, but added the noise "
                f"a deployment of N = {self.population} users with cohorts of m = "
                f"{self.clients_per_round} would add (noise on the sum scaled by m/m_big = "
                f"{self.noise_scale:.4g}; McMahan et al. 2018). The ε reported is that "
                f"deployment's, not this run's.")


def deployment(cfg: dict, population: int) -> Deployment:
    """The run's own deployment, or the one `simulate-population`/`-clients` name."""
    m = cfg["clients"]
    big_n, big_m = cfg["simulate-population"], cfg["simulate-clients"]
    if big_n == 0:
        return Deployment(population, m, 1.0, population, m)
    if big_n < population:
        raise ConfigError(
            f"run-config key 'simulate-population' = {big_n} is smaller than the {population} "
            "SuperNodes of this run; it must be at least that (or 0 = off)")
    return Deployment(big_n, big_m, m / big_m, population, m)
