"""aftune: Alignment Fine-Tuning (AFT) for chain-of-thought reasoners.

Data flows one way: tasks -> records -> sampling -> scoring/losses -> training -> evaluation.
"""

__version__ = "0.1.0"
