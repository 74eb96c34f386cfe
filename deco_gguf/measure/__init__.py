"""Measuring and reporting models: `info` (info), perplexity, throughput (speed, its report and bytes bound in
speed_report, speculative_speed), the equal-N dense Llama it compares with (dense_eq) and the plots (plotting)."""
