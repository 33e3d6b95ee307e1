"""Lightning plug-ins for the adaptive toolkit: thin adapters over the framework-free core."""
