"""TTT layer families and the machinery they share."""
