"""Run the bf16 model one decoder layer at a time on calibration text: activation statistics, routing counts
and Hessians for the planner, and calibrated GPTQ for the checkpoint writer (models larger than RAM work)."""
