"""FLOP accounting: exact formulas, the two counters and their report, the papers' approximations, peaks, the
planner, the step profile, scaling-law planning and fits, and every FLOP and scaling picture."""
