"""Reports: metric tables and figures."""
