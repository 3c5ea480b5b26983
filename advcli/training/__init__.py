"""The training wing: min_theta E max_{eta in S} L(f_theta(x + eta), y), epoch by epoch.

`build` (a run's settings checked and its objects built: data, model, optimiser, schedule), `train` (the run's
lifecycle: resume, epochs, the final evaluation), `epoch` (one pass over the data),
`objectives` (min-max, TRADES, MART, the adversarial-input class), `awp` (adversarial weight perturbation),
`averaging` (the EMA of the weights), `guards` (catastrophic overfitting, stop requests).

Imports every wing below it (runs, attacks, data, models, evaluation); only `advcli.cli` sits above it.
"""
