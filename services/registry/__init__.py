"""Fleet membership (joined, left, dead) and fleet-wide pulls (``corral registry``)."""
