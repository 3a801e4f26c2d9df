"""Expert feedback: the ratings store the server writes, and its export into training data."""
