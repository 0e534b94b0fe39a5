"""The regression gate: thresholds, and two reports compared (compare, check --baseline)."""
