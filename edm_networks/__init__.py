"""EDM-compatible networks and a safe loader for EDM network pickles (imports torch only)."""
