from tensorrt_llm._mpi import worker

if __name__ == "__main__":
    worker()
