"""What a run leaves on disk: run and checkpoint folders written atomically, trackers, and reports."""
