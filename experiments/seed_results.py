"""The figures the seed study reported, carried here as data so reports can set ours beside them.

The seed is four TensorFlow 1 notebooks (MLP 784-1000-1000-500-200-10, no biases, plain SGD at
0.1, batch 100, 2000 steps). Values marked approximate in its write-up were read off its plots;
its retraining did not keep the masks, so its "recovered" nets were no longer sparse. Its timings
came from a 2017 MacBook Pro (2.3 GHz Core i5), one wall-clock reading each, and it kept hidden
layer 4 whole when shrinking.
"""

SPARSITIES = (0, 25, 50, 60, 70, 80, 90, 95, 97, 99)

DENSE_ACCURACY_RUNS = (97.5, 97.0, 97.3, 97.4)

# Accuracy in percent at each of SPARSITIES; None where the seed reported nothing.
CURVES = {
    "sweep/weight": (97.5, 97.5, 97.3, 96.8, 96.3, 87.5, 44, 19, 15, 12),
    "sweep/unit": (97.5, 96, 94.5, 83, 51, 38, 17, 9, 6.5, 11),
    "recovery_weight/regrown": (97.5, 97.5, 97, 97.2, 97.2, 96.3, 96, 95.7, 95, 93.4),
    "recovery_unit/regrown": (97.5, 97.5, 97.3, 97, 96.6, 96.2, 95.7, 89.5, 77.5, 12),
    "shrink/before_retraining": (97.44, 95.00, 90.58, 70.12, 47.45, 29.44, 16.64, 14.19, 9.97,
                                 9.69),
    "shrink/after_retraining": (97.72, 96.95, 97.22, 97.13, 96.91, 96.72, 95.78, 91.29, 41.71,
                                19.99),
}

# Which values were read off plots (approximate) rather than printed.
APPROXIMATE = ("sweep/weight", "sweep/unit", "recovery_weight/regrown", "recovery_unit/regrown")

# Measured test-set speed-up of the shrunk net (x), hidden layer 4 kept whole.
SHRINK_SPEEDUP = (1.00, 1.46, 2.42, 3.16, 3.96, 5.41, 7.36, 8.64, None, None)

RETRAIN_STEPS = {"recovery_weight": 500, "recovery_unit": 1000, "shrink": 1000}


def at(curve: str, sparsity: float) -> float | None:
  """The seed's value of `curve` at `sparsity` percent, or None if it did not report it."""
  values = CURVES[curve] if curve in CURVES else None
  if values is None or sparsity not in SPARSITIES:
    return None
  return values[SPARSITIES.index(sparsity)]
