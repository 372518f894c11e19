"""The user-facing compression steps and the artifact contract they share."""
