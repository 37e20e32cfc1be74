"""FLOP accounting: exact formulas, the two counters, the papers' approximations, peaks, the planner."""
