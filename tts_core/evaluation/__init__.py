"""Does the audio do what the instruction asked? Measurements from audio + direction accuracies."""
