"""geovr.eval: VSI-Bench harness, profiles and scorer, the question generator, geometry metrics of the student, reports and pictures, and the held-out measurement."""
