"""Step 1: teach the model what preferred and dispreferred answers look like (SCIT or Dual)."""
