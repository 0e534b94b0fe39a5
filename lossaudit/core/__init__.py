"""The math an audit rests on: tokens, batches, layouts, reductions, the float64 reference,
gradients, and the errors and registries every part shares."""
