"""Exceptions raised by optlayer."""


class SolverError(RuntimeError):
    """A solve in the batch failed: infeasible, unbounded or not converged.

    Attributes:
        elements: indices of the failing batch elements, in increasing order.
        statuses: the solver's status string for each of those elements.
    """

    def __init__(self, message, elements=(), statuses=()):
        super().__init__(message)
        self.elements = tuple(int(i) for i in elements)
        self.statuses = tuple(statuses)
