"""Where the CA's keys live: keysets (an X.509 CA key and a JWT key that rotate together) loaded from and created
in a custody, on a schedule, with pins that let every replica check it signs only with keys the CA made.
"""
