from tensorrt_llm._mpi import leader

if __name__ == "__main__":
    leader()
