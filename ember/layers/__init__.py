"""Model building blocks (attention, linear, norm, rotary, activation, embedding); they call into ember.ops."""
