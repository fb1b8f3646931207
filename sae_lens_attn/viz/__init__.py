"""Looking at features: plots and dashboards."""
