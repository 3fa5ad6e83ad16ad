"""Training: the trial loop (one student or K in lockstep), fused students, the teacher's weights and its
shared outputs, checkpoints, and the device helpers they share.
"""
